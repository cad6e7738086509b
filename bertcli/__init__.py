"""bertcli: pretrain, fine-tune, evaluate and serve BERT from the command line."""

__version__ = "0.1.0"
