"""CLIF events to tokens: the event stream, admission codes, mergeable statistics, the
tokenizer, timelines and the hourly view, labels, splits."""
