"""Integrations with the training code of existing VLA policies (``openvla_oft``)."""
