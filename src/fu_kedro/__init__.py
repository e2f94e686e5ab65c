"""fu_kedro: FU-LoRA (Wang et al., MICCAI PIPPI 2024) as a Kedro project."""

__version__ = "0.1.0"
