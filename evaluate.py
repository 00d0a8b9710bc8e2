"""Score a trained model on its held-out text: `python evaluate.py ckpt_path=outputs/<run> adapt=true`."""

from shakespeare.cli.evaluate import evaluate

if __name__ == "__main__":
    evaluate()
