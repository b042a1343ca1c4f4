"""lmforge: train a language model through the whole InstructGPT process on a laptop CPU or GPUs.

Data flows: text -> tokenizer -> token shards -> pretrain -> SFT -> sample -> label -> reward model -> PPO
-> generate / report. Each stage is one module; see README.md for the map.
"""

__version__ = "0.1.0"
