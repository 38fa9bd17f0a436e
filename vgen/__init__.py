"""vgen: from a folder of captioned images to a trained text-to-image model, samples and a report."""

__version__ = "0.1.0"
