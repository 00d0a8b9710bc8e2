"""What a trained model is worth beyond its loss: lossless compression of a text by the model's predictions."""
