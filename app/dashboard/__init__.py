"""The Streamlit dashboard: clinicians adapt and classify, administrators review privacy budgets,
IT sees the federation. Page scripts are thin; the logic lives in the plain modules beside them."""
