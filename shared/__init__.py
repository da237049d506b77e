"""Code both the server and the sites import: CLIF I/O and validation, tokenizer, labels, config."""
