"""Promotion: the gate that decides whether a candidate becomes champion (scored beside the
champion on the same samples), and registering a candidate with its evidence."""
