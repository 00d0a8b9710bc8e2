"""Train one rung of the ablation ladder: `python train.py model=block_norm_dropout`."""

from shakespeare.cli.train import train

if __name__ == "__main__":
    train()
