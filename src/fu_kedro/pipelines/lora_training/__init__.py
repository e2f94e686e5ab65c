"""The ``lora_training`` pipeline.

The pipeline is ``.pipeline.create_pipeline``; the block's schema is ``.params`` (it imports
without the nodes, which import torch).
"""
