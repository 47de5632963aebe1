"""Entry points users run or submit with `ray job submit` (`python -m jobs.<name>`)."""
