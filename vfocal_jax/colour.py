"""Colour constants shared by the host pipeline (TensorFlow) and the device (JAX); imports neither."""

# ITU-R 601 luma weights of R, G, B: grayscale and contrast in the colour augmentation
# (`input_pipeline.transforms`) and the clip's mean luma in `pixels.normalize`.
LUMA = (0.299, 0.587, 0.114)
