"""Ray Data stages of the bifta labelling pipeline (one stage per module)."""
