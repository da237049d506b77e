"""MEDS out (a site as a MEDS dataset, our labels) and in (a MEDS directory as CLIF tables)."""
