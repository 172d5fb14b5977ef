"""QLoRA fine-tuning and evaluation of chat LLMs on 20 Newsgroups and SAMSum."""

__version__ = "0.2.0"
