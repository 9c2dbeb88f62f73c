"""Small widgets the windows share: fonts, tones, a pulsing dot, stat tiles, a badge, a banner.

Every class here is drawn on the Tk thread only; none of them reads an
engine. A window hands them plain values (already formatted by the pure
functions of its module) and they show them.
"""
from __future__ import annotations

import math
import time
import tkinter as tk
from tkinter import font as tkfont
from tkinter import ttk

from minitorrent.gui.base import fit_text

# Tones: one colour per meaning, readable with white text and on both the light and the dark theme.
TONES = {
    "ok": "#0f7b0f",  # serving, in sync
    "info": "#005fb8",  # standby, syncing
    "warn": "#b35900",  # lagging, no contact
    "error": "#c42b1c",  # failed, stopped unexpectedly
    "idle": "#767676",  # stopped, unknown
}
DARK_TONES = {"ok": "#6ccb5f", "info": "#60b4ff", "warn": "#fcb04a", "error": "#ff99a4"}  # as text on #1c1c1c
CAPTION_FOREGROUND = {"light": "#5f5f5f", "dark": "#a8a8a8"}
# Selected table rows, (background, text): sv-ttk's dark selection (#292929 on #1c1c1c) is nearly invisible.
SELECTION = {"light": ("#cce4f7", "#000000"), "dark": ("#1f5a8c", "#ffffff")}
PULSE_PERIOD_S = 1.6  # one gentle breath of the "serving" dot
PULSE_FRAME_MS = 60  # about 16 frames a second: smooth enough, nearly free


def current_theme(root: tk.Misc) -> str:
    """``dark`` or ``light``: which sv-ttk theme is in use (light for any other ttk theme)."""
    return "dark" if "dark" in ttk.Style(root).theme_use() else "light"


def install_fonts_and_styles(root: tk.Misc) -> None:
    """Create the windows' named fonts and ttk styles for the theme in use (call again after a theme change)."""
    family = tkfont.nametofont("TkDefaultFont", root).actual("family")
    fonts = {"MTTitle": (16, "bold"), "MTValue": (13, "bold"), "MTBadge": (20, "bold"), "MTCaption": (9, "normal"),
             "MTBody": (10, "normal")}
    kept = root.__dict__.setdefault("_minitorrent_fonts", {})  # a Font deletes its named font when collected
    for name, (size, weight) in fonts.items():
        if name not in kept:
            kept[name] = tkfont.Font(root, name=name, family=family, size=size, weight=weight)
    style = ttk.Style(root)
    caption = CAPTION_FOREGROUND[current_theme(root)]
    style.configure("Title.TLabel", font="MTTitle")
    style.configure("Value.TLabel", font="MTValue")
    style.configure("Caption.TLabel", font="MTCaption", foreground=caption)
    style.configure("Subtitle.TLabel", font="MTBody", foreground=caption)
    for tone, colour in text_tones(root).items():
        style.configure(f"{tone}.Value.TLabel", font="MTValue", foreground=colour if tone != "idle" else caption)
        style.configure(f"{tone}.Body.TLabel", font="MTBody", foreground=colour if tone != "idle" else caption)
    style.configure("Tile.TFrame", padding=(12, 6))
    selected, selected_text = SELECTION[current_theme(root)]
    style.map("Treeview", background=[("selected", selected)], foreground=[("selected", selected_text)])


def text_tones(widget: tk.Misc) -> dict[str, str]:
    """The tones as text colours for the theme in use (lighter on the dark theme, to stay readable)."""
    return {**TONES, **DARK_TONES} if current_theme(widget) == "dark" else dict(TONES)


def tone_style(tone: str) -> str:
    """The label style for a line of body text in ``tone`` (ok, info, warn, error, idle)."""
    return f"{tone}.Body.TLabel"


def set_style(label: ttk.Label, style: str) -> None:
    """Give ``label`` the ``style`` and that style's text colour.

    sv-ttk's palette (``tk_setPalette``) gives every label an explicit
    foreground, which would hide the colour of a style (tones, captions):
    the label is given the style's colour explicitly too.
    """
    styles = ttk.Style(label)
    colour = styles.lookup(style, "foreground") or styles.lookup("TLabel", "foreground")
    label.configure(style=style, foreground=colour)


def restyle_tree(widget: tk.Misc) -> None:
    """Every ttk label under ``widget`` takes its style's colour (after building, and after a theme change)."""
    for child in widget.winfo_children():
        if isinstance(child, ttk.Label):
            set_style(child, str(child.cget("style")) or "TLabel")
        restyle_tree(child)


def background(widget: tk.Misc) -> str:
    """The theme's window background as ``#rrggbb`` (for the few plain Tk widgets drawn among ttk ones)."""
    colour = str(ttk.Style(widget).lookup("TFrame", "background") or widget.winfo_toplevel().cget("background"))
    red, green, blue = (value // 257 for value in widget.winfo_rgb(colour))
    return f"#{red:02x}{green:02x}{blue:02x}"


def mix(colour_a: str, colour_b: str, share_b: float) -> str:
    """The colour ``share_b`` (0..1) of the way from ``colour_a`` to ``colour_b`` (both ``#rrggbb``)."""
    a = [int(colour_a[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(colour_b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * share_b):02x}" for x, y in zip(a, b))


class PulseDot(tk.Canvas):
    """A small round indicator: it breathes gently in ``tone`` while ``pulsing``, else it is still."""

    def __init__(self, master: tk.Misc, size: int = 14) -> None:
        super().__init__(master, width=size + 6, height=size + 6, highlightthickness=0, borderwidth=0)
        self._halo = self.create_oval(0, 0, size + 6, size + 6, outline="", fill="")
        self._dot = self.create_oval(3, 3, size + 3, size + 3, outline="", fill=TONES["idle"])
        self._tone = "idle"
        self._pulsing = False
        self._after_id: str | None = None
        self.refresh_theme()

    def show(self, tone: str, pulsing: bool) -> None:
        """Colour the dot with ``tone``; breathe while ``pulsing``."""
        if (tone, pulsing) == (self._tone, self._pulsing):
            return
        self._tone, self._pulsing = tone, pulsing
        if pulsing and self._after_id is None:
            self._frame()
        elif not pulsing:
            self._cancel()
            self._draw(0.0)

    def refresh_theme(self) -> None:
        """Match the theme's background (after a theme change)."""
        self._background = background(self)
        self.configure(background=self._background)
        self._draw(0.0)

    def destroy(self) -> None:
        self._cancel()
        super().destroy()

    def _cancel(self) -> None:
        if self._after_id is not None:
            self.after_cancel(self._after_id)
            self._after_id = None

    def _frame(self) -> None:
        phase = (time.monotonic() % PULSE_PERIOD_S) / PULSE_PERIOD_S
        self._draw((1 - math.cos(2 * math.pi * phase)) / 2)
        self._after_id = self.after(PULSE_FRAME_MS, self._frame)

    def _draw(self, breath: float) -> None:
        colour = TONES[self._tone]
        back = self._background
        self.itemconfigure(self._dot, fill=mix(colour, back, 0.35 * breath))
        self.itemconfigure(self._halo, fill=mix(back, colour, 0.25 * breath) if self._pulsing else "")


class FittedLabel(ttk.Label):
    """A label that shortens its text in the middle with an ellipsis when it is narrower than the text.

    It asks for no width of its own: grid it ``sticky="ew"`` in a column that gets its width elsewhere.
    """

    def __init__(self, master: tk.Misc, text: str = "", style: str = "TLabel") -> None:
        super().__init__(master, text=text, width=1)
        set_style(self, style)
        self.full_text = text
        for sequence in ("<Configure>", "<Map>"):
            self.bind(sequence, lambda _event: self._fit(), add="+")

    def show(self, text: str, style: str | None = None) -> None:
        """Display ``text`` (shortened if it must be), in ``style`` if given."""
        if style is not None:
            set_style(self, style)
        self.full_text = text
        self._fit()

    def _fit(self) -> None:
        width = self.winfo_width()
        unknown = width <= 1 or not self.winfo_ismapped()  # not laid out (a hidden tab): fitted once shown
        shown = self.full_text if unknown else fit_text(self.full_text, width - 4, self._font().measure)
        if self.cget("text") != shown:
            self.configure(text=shown)

    def _font(self) -> tkfont.Font:
        style = ttk.Style(self)
        name = str(style.lookup(str(self.cget("style") or "TLabel"), "font") or style.lookup("TLabel", "font") or "")
        return tkfont.nametofont(name if name in tkfont.names(self) else "TkDefaultFont")


class StatTile(ttk.Frame):
    """One figure of a status strip: a small caption, a bold value, a detail line under it (shortened to fit)."""

    def __init__(self, master: tk.Misc, caption: str) -> None:
        super().__init__(master, style="Tile.TFrame")
        self.caption = ttk.Label(self, text=caption.upper(), style="Caption.TLabel")
        self.value = FittedLabel(self, "—", style="Value.TLabel")
        self.detail = FittedLabel(self, "", style="Caption.TLabel")
        self.caption.grid(row=0, column=0, sticky="w")
        self.value.grid(row=1, column=0, sticky="ew", pady=(2, 0))
        self.detail.grid(row=2, column=0, sticky="ew")
        self.columnconfigure(0, weight=1)

    def show(self, value: str, detail: str = "", tone: str = "") -> None:
        """Display ``value`` (coloured by ``tone`` if given) and ``detail``."""
        style = f"{tone}.Value.TLabel" if tone in TONES else "Value.TLabel"
        if self.value.full_text != value or str(self.value.cget("style")) != style:
            self.value.show(value, style=style)
        if self.detail.full_text != detail:
            self.detail.show(detail)


class TileStrip(ttk.Frame):
    """A row of ``StatTile``s sharing the width equally, separated by thin rules."""

    def __init__(self, master: tk.Misc, captions: dict[str, str]) -> None:
        super().__init__(master)
        self.tiles: dict[str, StatTile] = {}
        for column, (key, caption) in enumerate(captions.items()):
            if column:
                ttk.Separator(self, orient="vertical").grid(row=0, column=2 * column - 1, sticky="ns", pady=6)
            tile = self.tiles[key] = StatTile(self, caption)
            tile.grid(row=0, column=2 * column, sticky="nsew")
            self.columnconfigure(2 * column, weight=1, uniform="tile")

    def show(self, values: dict[str, tuple[str, str, str]]) -> None:
        """``values`` maps a tile's key to (value, detail, tone)."""
        for key, (value, detail, tone) in values.items():
            if key in self.tiles:
                self.tiles[key].show(value, detail, tone)


class ProgressStrip(ttk.Frame):
    """A line of text over a progress bar, shown only while there is something to report."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master)
        self.label = ttk.Label(self, text="", anchor="w")
        self.bar = ttk.Progressbar(self, mode="determinate", maximum=1.0)
        self.label.grid(row=0, column=0, sticky="ew")
        self.bar.grid(row=1, column=0, sticky="ew", pady=(4, 0))
        self.columnconfigure(0, weight=1)

    def place_at(self, row: int) -> None:
        """Grid the strip in its window's column at ``row``, hidden until ``show``."""
        self.grid(row=row, column=0, sticky="ew", pady=(0, 8))
        self.grid_remove()

    def show(self, text: str, fraction: float | None = None) -> None:
        """Show ``text`` and, if given, the bar at ``fraction`` (0..1)."""
        self.label.configure(text=text)
        if fraction is not None:
            self.bar.configure(value=fraction)
        self.grid()

    def hide(self) -> None:
        """Take the strip off the window (its grid place is kept)."""
        self.grid_remove()


class Badge(tk.Label):
    """A large coloured label stating a role: white text on the tone's colour."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, text="…", font="MTBadge", foreground="#ffffff", background=TONES["idle"],
                         padx=22, pady=10, anchor="center")

    def show(self, text: str, tone: str) -> None:
        """Display ``text`` on the colour of ``tone``."""
        colour = TONES.get(tone, TONES["idle"])
        if self.cget("text") != text or self.cget("background") != colour:
            self.configure(text=text, background=colour)


class Banner(tk.Frame):
    """A dismissible message across the window for errors and notices.

    Grid it where it belongs, then ``hide()`` it: ``show`` puts it back there.
    """

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, background=TONES["error"])
        self.label = tk.Label(self, text="", foreground="#ffffff", background=TONES["error"], anchor="w",
                              justify="left", padx=10, pady=6, font="MTBody")
        self.close = tk.Label(self, text="✕", foreground="#ffffff", background=TONES["error"], padx=10,
                              cursor="hand2", font="MTBody")
        self.label.pack(side="left", fill="x", expand=True)
        self.close.pack(side="right")
        self.close.bind("<Button-1>", lambda _event: self.hide())
        self.label.bind("<Configure>", lambda event: self.label.configure(wraplength=max(200, event.width - 20)))
        self._shown = True

    @property
    def text(self) -> str:
        """The message shown ('' when hidden)."""
        return self.label.cget("text") if self._shown else ""

    def show(self, text: str, tone: str = "error") -> None:
        """Show ``text`` on the tone's colour (replacing any message shown)."""
        colour = TONES.get(tone, TONES["error"])
        for widget in (self, self.label, self.close):
            widget.configure(background=colour)
        self.label.configure(text=text)
        if not self._shown:
            self.grid()
            self._shown = True

    def hide(self) -> None:
        """Hide the banner."""
        if self._shown:
            self.grid_remove()
            self._shown = False


class ErrorBanner(Banner):
    """The banner of a window's errors: the latest is shown with how many more; dismissing forgets them."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master)
        self.errors: list[str] = []
        self.close.bind("<Button-1>", lambda _event: self.errors.clear(), add="+")

    def add(self, text: str) -> None:
        """Show ``text`` as the latest error (the same error twice in a row counts once: a poll may repeat it)."""
        if not self.errors or self.errors[-1] != text:
            self.errors.append(text)
        self.show(errors_text(self.errors), "error")


def errors_text(errors: list[str]) -> str:
    """The banner for the errors not yet dismissed: the latest, and how many more."""
    if not errors:
        return ""
    more = len(errors) - 1
    return errors[-1] + (f"  (and {more} more: see the log)" if more else "")


def theme_button_text(theme: str) -> str:
    """The label of the theme toggle: what a click switches to."""
    return "☀  Light" if theme == "dark" else "☾  Dark"
