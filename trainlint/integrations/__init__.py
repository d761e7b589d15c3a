"""Adapters for training engines: ``trainlint.integrations.lightning`` and
``trainlint.integrations.transformers``.

Each is imported only when you import it, so ``import trainlint`` never imports Lightning or
transformers. The adapters are thin: every decision is ``trainlint.Monitor``'s.
"""
