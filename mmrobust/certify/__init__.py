"""Certification: Lipschitz estimates, certified radii, vulnerability indicators."""
