"""Ray actors that run dni stages on their own devices (the distributed runtime).

Only this package imports Ray; it builds on :mod:`dni` and never the reverse.
"""
