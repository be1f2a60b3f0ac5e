"""Reading and writing checkpoints: official `.pth`, safetensors, and Hugging Face / fla layouts."""

from aviary.io.checkpoint import CheckpointError, read_state_dict, read_time_state, write_state_dict

__all__ = ["CheckpointError", "read_state_dict", "read_time_state", "write_state_dict"]
