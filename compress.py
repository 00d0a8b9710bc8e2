"""Compress a file with a trained model: `python compress.py ckpt_path=outputs/<run> input=notes.txt` (and mode=decompress)."""

from shakespeare.cli.compress import compress

if __name__ == "__main__":
    compress()
