"""The files of a Valley HF directory (copied verbatim next to its config.json and named by ``auto_map``)."""
from mllm_mega.models.families.valley.hf.configuration_valley import ValleyConfig  # noqa: F401
from mllm_mega.models.families.valley.hf.modeling_valley import ValleyForConditionalGeneration  # noqa: F401
