"""``base_training``: the phantom prior corpus -> a tiny SD-architecture base, saved as a diffusers folder.

The pipeline is ``.pipeline.create_pipeline``; the block's schema is ``.params`` (it imports
without the nodes, which import torch).
"""
