"""`sdtune serve`: the web app, the generation API with its batching queue, the hybrid split and metrics."""
