"""What leaves the training loop for users: the model folder (`save_pipeline`, folder.py), its model card (card.py)
and its upload to the Hugging Face Hub (`HubUploader`, hub.py).
"""

from .card import write_model_card, write_run_card
from .folder import ModelWriteError, save_pipeline
from .hub import HubUploader, MissingHubTokenError

__all__ = [
    "HubUploader",
    "MissingHubTokenError",
    "ModelWriteError",
    "save_pipeline",
    "write_model_card",
    "write_run_card",
]
