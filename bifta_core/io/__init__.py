"""The method's inputs and outputs: storage (local and S3), image decoding, model loading and
downloads, the LLM client and description generation, label-set files and artifacts, kept
embeddings, and the output rows."""
