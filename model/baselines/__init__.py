"""Feed-forward dehazers of the field, re-implemented as baselines trained and evaluated under the project's protocol.

Every network here maps a hazy ``img01`` (B,3,H,W) in [0,1] to its output through ``forward`` (what its training
loss compares: the image, or MSCNN's transmission) and to a dehazed image (B,3,H,W) in [0,1] (clamped) through
``restore``; ``size_multiple`` is the side length the input must be a multiple of (the inference pipeline pads
to it by reflection). A network whose output is not the image (MSCNN's t) also has ``dehaze(img01, output)``, which
turns its output — computed whole or in tiles — into the dehazed image.

* :class:`model.baselines.aodnet.AODNet` (Li et al., ICCV 2017)
* :class:`model.baselines.mscnn.MSCNN` (Ren et al., ECCV 2016)
* :class:`model.baselines.dehazeformer.DehazeFormer` (Song et al., TIP 2023), sizes T / S / B
* :class:`model.baselines.deblurgan.ResnetGenerator` + :class:`model.baselines.deblurgan.PatchCritic`
  (Kupyn et al., CVPR 2018)
"""
