"""Looking at predictions: polars queries over a prediction folder (``analytics``), the static
review page (``page``) and the Label Studio export format (``label_studio``)."""
