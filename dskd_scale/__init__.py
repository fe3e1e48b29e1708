"""dskd_scale: Dual-Space Knowledge Distillation of LLMs at cluster scale.

Importing the package is cheap: it pulls in neither torch.distributed, deepspeed nor transformers.
"""

__version__ = "0.1.0"
