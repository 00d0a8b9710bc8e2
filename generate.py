"""Write with a trained model: `python generate.py ckpt_path=outputs/<run>/checkpoints/best.ckpt prompt="ROMEO:"`."""

from shakespeare.cli.generate import generate

if __name__ == "__main__":
    generate()
