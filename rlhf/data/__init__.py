"""Prompt data: built-in tasks, file formats, validation and resumable sharded batches."""
from rlhf.data.prompts import DataError, PromptBatch, PromptSource, load_prompt_dataset
from rlhf.data.tasks import TASKS

__all__ = ["DataError", "PromptBatch", "PromptSource", "TASKS", "load_prompt_dataset"]
