"""Ray code of bifta: the stages of the labelling, evaluation and training jobs, the listing into
shards (``inputs``), the shard writers (``write``) and the one plan builder they share (``plan``)."""
