"""What leaves the training loop for users: the model folder, its model card and its upload to the Hub.

The folder is `save_pipeline`'s (folder.py), the card card.py's, and the upload to the Hugging Face Hub
`HubUploader`'s (hub.py).
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
