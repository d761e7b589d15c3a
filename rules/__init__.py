"""The rule catalog: one module per concern; each rule is a pure function of the RunTrace.

Import :mod:`trainlint.engine` and call ``load_rules()`` to register them all.
"""
