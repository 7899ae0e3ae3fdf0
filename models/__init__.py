"""The SST video object segmentation model and its data, built on sst_triton."""
