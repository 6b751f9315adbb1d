"""Token-level constants shared by the historical LLaVA code and ours."""

from __future__ import annotations

#: Out-of-vocabulary id that marks an image position in ``input_ids`` (LLaVA's ``IMAGE_TOKEN_INDEX``).
#: A single one is the historical placeholder; after expansion every image feature position holds it.
IMAGE_TOKEN_INDEX = -200
#: Label value ignored by the loss (``torch.nn.CrossEntropyLoss`` default).
IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

#: Public hub ids used as defaults; resolved lazily (never at import) by ``loading.files``.
RADIALOG_HUB_ID = "ChantalPellegrini/RaDialog-interactive-radiology-report-generation"
LLAVA_BASE_HUB_ID = "liuhaotian/llava-v1.5-7b"
