"""Model families: one sub-package per family, whose ``__init__`` registers its :class:`FamilySpec`.

:mod:`mllm_mega.models.registry` imports every sub-package here; nothing else imports them directly.
"""
