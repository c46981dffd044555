"""The tokenizer service: prompt or chat → token count and block keys, on ``im.tokenize``."""
