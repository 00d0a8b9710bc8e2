"""The TensorBoard tags a run writes the figures under that the report reads back. They live here, apart from the
callbacks that write them, so that the report finds them without importing Lightning."""

TOKENS_PER_SECOND = "throughput/tokens_per_sec"
ELAPSED = "time/elapsed"  # seconds of training so far, over every session of a resumed run
LOSS_BY_POSITION = "val_loss_by_position"  # val_loss_by_position/01 ... /T: the loss at each position of the window
ATTENTION = "inspection/attention"  # the attention grid the Inspection callback logs after every validation
