"""Blocks shared by the model families (pure torch, no files, no napari).

* :mod:`.ldm`: the LDM convolutional autoencoder (GroupNorm + swish residual blocks, single-head
  spatial attention, stride-2 down / nearest up, ``Encoder`` / ``Decoder``): AR-Seg's mask
  autoencoder and MARSeg's KL-16 tokenizer.
* :mod:`.attention`: multi-head self-attention through ``scaled_dot_product_attention`` with an
  optional mask and KV cache: AR-Seg's next-scale transformer and MARSeg's MAR blocks.
"""
