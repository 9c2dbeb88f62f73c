"""The three windows (Tkinter, themed with sv-ttk). Each holds an engine and never blocks the Tk thread."""
