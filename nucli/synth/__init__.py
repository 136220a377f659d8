"""Style-consistent synthesis of labelled nucleus images for training.

After Gong et al., "Style Consistent Image Generation for Nuclei Instance
Segmentation" (WACV 2021):

* :mod:`~nucli.synth.deform`      -- instance deformation (resize, rotation, contour bend, mask blur);
* :mod:`~nucli.synth.background`  -- backgrounds with the nuclei inpainted away;
* :mod:`~nucli.synth.compose`     -- the pre-synthesis ``ID(x)``: nuclei textures + background in HED space;
* :mod:`~nucli.synth.adain`       -- AdaIN style refinement (encoder, AdaIN, decoder with skips);
* :mod:`~nucli.synth.adversarial` -- task-adversarial training of generator, image discriminator and
  segmenter (Algorithm 1 of the paper), and the ablation without synthesis;
* :mod:`~nucli.synth.writer`      -- write synthetic image/label pairs to a folder.

Importing the package imports nothing heavy.
"""
