"""mmrobust: adversarial robustness of multi-modal (late-fusion) classifiers."""

__version__ = "0.1.0"
