"""gpt2np_convert: turn OpenAI's published GPT-2 checkpoints into gpt2np model folders.

The only part of the project that imports TensorFlow (install with `pip install gpt2np[convert]`).
"""
