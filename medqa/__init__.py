"""medqa: LoRA fine-tuning of Llama 3.1 8B (4-bit, Unsloth) on PubMedQA with Lightning."""

__version__ = "0.1.0"
