"""What the phone's screen shows and how it reacts to input, and the simulated app.

The home screen is a launcher with one icon per launchable app. The preinstalled
app ``com.stepline.social`` has three screens:

* ``login``: ``USERNAME_FIELD``, ``PASSWORD_FIELD``, ``LOGIN_BUTTON``. Logging in
  with a non-empty username and password adds the username to the phone's
  ``accounts`` and opens the feed.
* ``feed``: ``COMPOSE_BUTTON`` opens the composer, ``LOGOUT_BUTTON`` signs out,
  the posts are listed newest first (a vertical swipe scrolls them).
* ``compose``: ``POST_FIELD`` (focused on open), ``POST_BUTTON`` publishes the
  text (1 to ``MAX_POST_LENGTH`` characters) and returns to the feed.

A tap on a text field focuses it; ``input text`` appends to the focused field,
``KEYCODE_DEL`` deletes its last character, ``KEYCODE_ENTER`` moves from the
username to the password field and submits the login form. ``KEYCODE_BACK``
goes compose -> feed -> home (login -> home); ``KEYCODE_HOME`` shows the home
screen. The tap targets are the (x, y) centres below, for a 1080x2400 screen.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from stepline.phone.model import (
    LAUNCHER_ACTIVITY,
    LAUNCHER_PACKAGE,
    SOCIAL_ACTIVITY,
    SOCIAL_PACKAGE,
    PhoneModel,
    Post,
)

KEYCODE_HOME = 3
KEYCODE_BACK = 4
KEYCODE_ENTER = 66
KEYCODE_DEL = 67
MAX_POST_LENGTH = 280


@dataclass(frozen=True)
class Rect:
    left: int
    top: int
    right: int
    bottom: int

    def contains(self, x: int, y: int) -> bool:
        return self.left <= x < self.right and self.top <= y < self.bottom

    @property
    def center(self) -> tuple[int, int]:
        return ((self.left + self.right) // 2, (self.top + self.bottom) // 2)


# --- layout (1080x2400) ----------------------------------------------------------------

STATUS_BAR_HEIGHT = 90

LOGIN_LAYOUT = {
    "username": Rect(140, 740, 940, 860),
    "password": Rect(140, 940, 940, 1060),
    "login": Rect(240, 1160, 840, 1280),
}
FEED_LAYOUT = {
    "compose": Rect(140, 300, 940, 420),
    "logout": Rect(820, 150, 1040, 250),
}
COMPOSE_LAYOUT = {
    "post": Rect(100, 400, 980, 900),
    "publish": Rect(240, 1000, 840, 1120),
}
FEED_TOP = 480
POST_HEIGHT = 180

USERNAME_FIELD = LOGIN_LAYOUT["username"].center
PASSWORD_FIELD = LOGIN_LAYOUT["password"].center
LOGIN_BUTTON = LOGIN_LAYOUT["login"].center
COMPOSE_BUTTON = FEED_LAYOUT["compose"].center
LOGOUT_BUTTON = FEED_LAYOUT["logout"].center
POST_FIELD = COMPOSE_LAYOUT["post"].center
POST_BUTTON = COMPOSE_LAYOUT["publish"].center


def launcher_icon(index: int) -> Rect:
    """The home screen's icon ``index`` (four per row)."""
    left = 60 + (index % 4) * 250
    top = 400 + (index // 4) * 320
    return Rect(left, top, left + 210, top + 210)


SOCIAL_ICON = launcher_icon(0).center
"""Tap target of com.stepline.social on the home screen (the first icon)."""


def launchable(model: PhoneModel) -> list[str]:
    """Apps with a home-screen icon: the social app first, then others by name."""
    names = sorted(name for name, pkg in model.packages.items() if not pkg.system)
    return sorted(names, key=lambda name: name != SOCIAL_PACKAGE)


def current_screen(model: PhoneModel) -> str:
    """``home``, ``login``/``feed``/``compose`` (social app) or ``app`` (another app)."""
    if model.foreground_package == LAUNCHER_PACKAGE:
        return "home"
    if model.foreground_package == SOCIAL_PACKAGE:
        return model.app.screen
    return "app"


def targets(model: PhoneModel) -> dict[str, Rect]:
    """The tappable elements of the current screen by name."""
    screen = current_screen(model)
    if screen == "home":
        return {name: launcher_icon(i) for i, name in enumerate(launchable(model))}
    return {"login": LOGIN_LAYOUT, "feed": FEED_LAYOUT, "compose": COMPOSE_LAYOUT}.get(screen, {})


# --- navigation -----------------------------------------------------------------------


def go_home(model: PhoneModel) -> None:
    model.foreground_package = LAUNCHER_PACKAGE
    model.foreground_activity = LAUNCHER_ACTIVITY


def launch(model: PhoneModel, package: str) -> None:
    """Bring ``package`` to the foreground (starting it when it is not running)."""
    if package == LAUNCHER_PACKAGE:
        go_home(model)
        return
    model.foreground_package = package
    model.foreground_activity = model.packages[package].activity or SOCIAL_ACTIVITY
    if package == SOCIAL_PACKAGE and package not in model.running:
        model.app.reset_ui()
    model.running.add(package)


def force_stop(model: PhoneModel, package: str) -> None:
    model.running.discard(package)
    if package == SOCIAL_PACKAGE:
        model.app.reset_ui()
    if model.foreground_package == package:
        go_home(model)


def clear_data(model: PhoneModel, package: str) -> None:
    """``pm clear``: stop the app and forget its data (the social app: sign out every
    account; published posts live on the app's server and stay)."""
    force_stop(model, package)
    if package == SOCIAL_PACKAGE:
        model.app.user = None
        model.accounts.clear()
        model.app.reset_ui()


# --- input ----------------------------------------------------------------------------


def _layout_point(model: PhoneModel, x: int, y: int) -> tuple[int, int]:
    """Screen pixels to layout pixels (the layout is drawn for 1080x2400)."""
    return x * 1080 // model.screen_width, y * 2400 // model.screen_height


def tap(model: PhoneModel, x: int, y: int) -> None:
    x, y = _layout_point(model, x, y)
    screen = current_screen(model)
    hit = next((name for name, rect in targets(model).items() if rect.contains(x, y)), None)
    if screen == "home":
        if hit is not None:
            launch(model, hit)
        return
    app = model.app
    if screen == "login":
        if hit in ("username", "password"):
            app.focus = hit
        elif hit == "login":
            _login(model)
        else:
            app.focus = None
    elif screen == "feed":
        if hit == "compose":
            app.screen, app.focus, app.message = "compose", "post", ""
            app.fields["post"] = ""
        elif hit == "logout":
            if app.user is not None:
                model.accounts.discard(app.user)
            app.user = None
            app.reset_ui()
    elif screen == "compose":
        if hit == "post":
            app.focus = "post"
        elif hit == "publish":
            _publish(model)


def swipe(model: PhoneModel, x1: int, y1: int, x2: int, y2: int) -> None:
    _, y1 = _layout_point(model, x1, y1)
    _, y2 = _layout_point(model, x2, y2)
    if current_screen(model) == "feed":
        room = max(0, len(model.app.posts) * POST_HEIGHT - (2400 - FEED_TOP))
        model.app.scroll = min(room, max(0, model.app.scroll + (y1 - y2)))


def type_text(model: PhoneModel, text: str) -> None:
    if current_screen(model) in ("login", "compose") and model.app.focus:
        model.app.fields[model.app.focus] += text


def key(model: PhoneModel, code: int) -> None:
    screen = current_screen(model)
    app = model.app
    if code == KEYCODE_HOME:
        go_home(model)
    elif code == KEYCODE_BACK:
        if screen == "compose":
            app.screen, app.focus = "feed", None
        elif screen != "home":
            go_home(model)
    elif code == KEYCODE_DEL:
        if screen in ("login", "compose") and app.focus:
            app.fields[app.focus] = app.fields[app.focus][:-1]
    elif code == KEYCODE_ENTER and screen == "login":
        if app.focus == "username":
            app.focus = "password"
        else:
            _login(model)


def _login(model: PhoneModel) -> None:
    app = model.app
    username, password = app.fields["username"].strip(), app.fields["password"]
    if not username or not password:
        app.message = "Enter a username and a password"
        return
    app.user = username
    model.accounts.add(username)
    app.screen, app.focus, app.message, app.scroll = "feed", None, "", 0
    app.fields["username"] = app.fields["password"] = ""


def _publish(model: PhoneModel) -> None:
    app = model.app
    text = app.fields["post"].strip()
    if not text:
        app.message = "Write something first"
        return
    if len(text) > MAX_POST_LENGTH:
        app.message = f"Posts are at most {MAX_POST_LENGTH} characters"
        return
    app.posts.append(Post(author=app.user or "", text=text, time=time.time()))
    app.fields["post"] = ""
    app.screen, app.focus, app.message, app.scroll = "feed", None, "", 0


# --- rendering ------------------------------------------------------------------------

_BACKGROUND = (245, 246, 250)
_ACCENT = (37, 99, 235)
_TEXT = (17, 24, 39)
_MUTED = (107, 114, 128)
_ERROR = (185, 28, 28)
_WHITE = (255, 255, 255)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(model: PhoneModel) -> Image.Image:
    """The current screen as an RGB image of the phone's screen size."""
    scale_x = model.screen_width / 1080
    scale_y = model.screen_height / 2400
    image = Image.new("RGB", (1080, 2400), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    _status_bar(draw, model)
    screen = current_screen(model)
    if screen == "home":
        _home(draw, model)
    elif screen == "login":
        _login_screen(draw, model)
    elif screen == "feed":
        _feed(draw, model)
    elif screen == "compose":
        _compose(draw, model)
    else:
        draw.text((540, 1100), model.foreground_package, fill=_TEXT, font=_font(48), anchor="mm")
        draw.text((540, 1180), "is running", fill=_MUTED, font=_font(40), anchor="mm")
    if (scale_x, scale_y) != (1, 1):
        image = image.resize((model.screen_width, model.screen_height))
    return image


def screenshot_png(model: PhoneModel) -> bytes:
    buffer = io.BytesIO()
    render(model).save(buffer, format="PNG", compress_level=1)  # fast; ~80 KB
    return buffer.getvalue()


def _status_bar(draw: ImageDraw.ImageDraw, model: PhoneModel) -> None:
    draw.rectangle((0, 0, 1080, STATUS_BAR_HEIGHT), fill=_TEXT)
    draw.text((40, 45), model.serial_name, fill=_WHITE, font=_font(34), anchor="lm")
    level = model.effective_battery()
    colour = _ERROR if level <= 15 else _WHITE
    draw.text((1040, 45), f"{level}%", fill=colour, font=_font(34), anchor="rm")


def _button(draw: ImageDraw.ImageDraw, rect: Rect, label: str) -> None:
    draw.rounded_rectangle((rect.left, rect.top, rect.right, rect.bottom), 24, fill=_ACCENT)
    draw.text(rect.center, label, fill=_WHITE, font=_font(46), anchor="mm")


def _field(draw: ImageDraw.ImageDraw, rect: Rect, text: str, hint: str, focused: bool) -> None:
    outline = _ACCENT if focused else _MUTED
    box = (rect.left, rect.top, rect.right, rect.bottom)
    draw.rounded_rectangle(box, 16, fill=_WHITE, outline=outline, width=6 if focused else 3)
    shown = text + ("|" if focused else "")
    fill = _TEXT if text else _MUTED
    draw.text(
        (rect.left + 30, rect.center[1]), shown or hint, fill=fill, font=_font(42), anchor="lm"
    )


def _home(draw: ImageDraw.ImageDraw, model: PhoneModel) -> None:
    draw.text((540, 250), "Home", fill=_TEXT, font=_font(64), anchor="mm")
    for name, rect in targets(model).items():
        draw.rounded_rectangle((rect.left, rect.top, rect.right, rect.bottom), 40, fill=_ACCENT)
        initial = name.rsplit(".", 1)[-1][:1].upper()
        draw.text(rect.center, initial, fill=_WHITE, font=_font(110), anchor="mm")
        label = name.rsplit(".", 1)[-1][:12]
        draw.text(
            (rect.center[0], rect.bottom + 40), label, fill=_TEXT, font=_font(34), anchor="mm"
        )


def _login_screen(draw: ImageDraw.ImageDraw, model: PhoneModel) -> None:
    app = model.app
    draw.text((540, 450), "Stepline Social", fill=_TEXT, font=_font(80), anchor="mm")
    draw.text((540, 560), "Sign in", fill=_MUTED, font=_font(44), anchor="mm")
    focus = app.focus
    _field(draw, LOGIN_LAYOUT["username"], app.fields["username"], "Username", focus == "username")
    masked = "*" * len(app.fields["password"])
    _field(draw, LOGIN_LAYOUT["password"], masked, "Password", focus == "password")
    _button(draw, LOGIN_LAYOUT["login"], "Log in")
    if app.message:
        draw.text((540, 1380), app.message, fill=_ERROR, font=_font(40), anchor="mm")


def _feed(draw: ImageDraw.ImageDraw, model: PhoneModel) -> None:
    app = model.app
    draw.text((40, 200), f"Feed - @{app.user or ''}", fill=_TEXT, font=_font(56), anchor="lm")
    logout = FEED_LAYOUT["logout"]
    draw.text(logout.center, "Log out", fill=_ACCENT, font=_font(40), anchor="mm")
    _button(draw, FEED_LAYOUT["compose"], "New post")
    top = FEED_TOP - app.scroll
    for post in reversed(app.posts):
        if top + POST_HEIGHT > FEED_TOP and top < 2400:
            box = (40, top, 1040, top + POST_HEIGHT - 20)
            draw.rounded_rectangle(box, 16, fill=_WHITE)
            draw.text((80, top + 45), f"@{post.author}", fill=_ACCENT, font=_font(36), anchor="lm")
            draw.text((80, top + 105), post.text[:40], fill=_TEXT, font=_font(40), anchor="lm")
        top += POST_HEIGHT
    if not app.posts:
        draw.text((540, 700), "No posts yet", fill=_MUTED, font=_font(44), anchor="mm")


def _compose(draw: ImageDraw.ImageDraw, model: PhoneModel) -> None:
    app = model.app
    draw.text((40, 250), "New post", fill=_TEXT, font=_font(64), anchor="lm")
    rect = COMPOSE_LAYOUT["post"]
    focused = app.focus == "post"
    box = (rect.left, rect.top, rect.right, rect.bottom)
    draw.rounded_rectangle(box, 16, fill=_WHITE, outline=_ACCENT if focused else _MUTED, width=5)
    text = app.fields["post"]
    lines = [text[i : i + 36] for i in range(0, len(text), 36)][:8] or [""]
    if not text:
        draw.text((rect.left + 30, rect.top + 50), "What's new?", fill=_MUTED, font=_font(42))
    else:
        for row, line in enumerate(lines):
            draw.text((rect.left + 30, rect.top + 30 + row * 56), line, fill=_TEXT, font=_font(42))
    _button(draw, COMPOSE_LAYOUT["publish"], "Post")
    if app.message:
        draw.text((540, 1200), app.message, fill=_ERROR, font=_font(40), anchor="mm")
