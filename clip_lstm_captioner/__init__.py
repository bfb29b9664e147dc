"""The team's modules behind the scripts: data sources and splits, the shapes set, the embedding
cache, reports, publishing, the demo's encoder pre-training and small command-line helpers.

The model itself lives in the three top-level files a Hub repo carries (configuration_clip_lstm.py,
modeling_clip_lstm.py, processing.py); they never import this package.
"""
