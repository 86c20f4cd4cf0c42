"""Publishing a saved model folder to the Hugging Face Hub, in the background, without ever stopping training.

    uploader = HubUploader("me/ddpm-butterflies-128", private=True)
    uploader.check_token()     # before training: fails with the fix in the message
    uploader.create_repo()     # exist_ok; private honoured
    uploader.upload("ddpm-butterflies-128", "Epoch 29")   # returns at once; a failure is a counted warning
    uploader.wait()            # before fit returns

`api` is injectable (anything with HfApi's create_repo / upload_folder), so tests can stand in for the Hub;
HF_ENDPOINT points the real client at another server.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import Future

from huggingface_hub import HfApi, get_token

from .. import files

log = logging.getLogger(__name__)

# What an upload carries: an allow-list, so nothing else in output_dir goes up (validate/, a user's notes, the
# lock, partial writes). The model folder's files, the card and its image, and the generated grids:
PUBLISHED = [
    "model_index.json",
    "unet/*",
    "scheduler/*",
    files.CARD,
    files.CARD_IMAGE,
    f"{files.SAMPLES}/{files.GRIDS}",
]
# Only when asked (save.hub_upload_logs): the run's records, which name local paths (and the event file the host)
LOGS = [f"{files.LOGS}/*", files.SUMMARY]
# Only when asked (save.hub_upload_data_preview): 16 of the training images, as the model gets them
DATA_PREVIEW = [f"{files.SAMPLES}/{files.DATA_PREVIEW}"]


class MissingHubTokenError(RuntimeError):
    """push_to_hub is on, but no Hugging Face token was found; the message says how to give one."""


class HubUploader:
    """Uploads a saved model folder to a Hub repo in the background, one upload at a time.

    Args:
        repo_id: the Hub repo, "user/name" or "name" (create_repo completes it).
        private: create the repo private.
        token: the Hugging Face token; huggingface_hub's own (`hf auth login`, HF_TOKEN) when left out.
        api: the client (anything with HfApi's create_repo / upload_folder); HfApi by default.
        upload_logs: also upload the run's records (`LOGS`).
        upload_data_preview: also upload samples/data.png (`DATA_PREVIEW`).
    """

    def __init__(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        api: HfApi | None = None,
        upload_logs: bool = False,
        upload_data_preview: bool = False,
    ) -> None:
        self.repo_id = repo_id
        self.allow_patterns = PUBLISHED + (LOGS if upload_logs else []) + (DATA_PREVIEW if upload_data_preview else [])
        self.private = private
        self.token = token
        self.api = api or HfApi(token=token)
        self.failures = self.uploads = 0
        self._pending: Future | None = None

    def check_token(self) -> None:
        """Fail with the fix when there is no token to upload with."""
        if self.token or get_token():
            return
        raise MissingHubTokenError(
            f"push_to_hub is on but no Hugging Face token was found, so {self.repo_id!r} could not be uploaded. "
            "Fix: run `hf auth login`, or set HF_TOKEN, or turn pushing off with --save.push_to_hub false."
        )

    def create_repo(self) -> str:
        """Create the repo if it does not exist; return its full id."""
        repo = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
        self.repo_id = repo.repo_id
        return self.repo_id

    def upload(self, folder: str, message: str) -> None:
        """Start uploading `folder` in the background (one upload at a time: waits for the previous one)."""
        self.wait()
        allow = list(self.allow_patterns)  # its own list: the upload runs in the background
        upload = {"repo_id": self.repo_id, "folder_path": folder, "commit_message": message, "allow_patterns": allow}
        self._pending = self.api.run_as_future(self.api.upload_folder, **upload)

    def wait(self) -> None:
        """Wait for the upload in flight, if any; a failure becomes a counted warning, never an exception."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
            self.uploads += 1
        except Exception as err:
            self.failures += 1
            msg = (
                f"Upload to the Hub repo {self.repo_id!r} failed ({self.failures} so far): {err!r}. Training goes "
                "on; the next save uploads again."
            )
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
