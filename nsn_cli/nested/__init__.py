"""The method, torch only: the nested layer, decompositions, surgery, costs and budgets.

Nothing here reads or writes files; everything takes tensors, models and batches.
"""
