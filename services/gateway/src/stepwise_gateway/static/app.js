// Entry point: a tiny router over two pages, plus the screenshot viewer.

import { h } from "./dom.js";
import { homePage } from "./home.js";
import { sessionPage } from "./session.js";

const root = document.getElementById("app");
const dialog = document.getElementById("viewer");
const dialogImage = dialog.querySelector("img");
const dialogCaption = dialog.querySelector("figcaption");
let teardown = null;

const viewer = {
  open(url, label) {
    dialogImage.src = url;
    dialogImage.alt = label;
    dialogCaption.textContent = label;
    dialog.showModal();
  },
};
dialog.addEventListener("click", (event) => {
  if (event.target === dialog || event.target.closest("[data-close]")) dialog.close();
});

function navigate(path) {
  history.pushState({}, "", path);
  route();
}

function route() {
  if (teardown) teardown();
  teardown = null;
  const match = location.pathname.match(/^\/sessions\/([A-Za-z0-9_-]{1,64})\/?$/);
  if (match) {
    teardown = sessionPage(root, match[1], { viewer });
  } else if (location.pathname === "/" || location.pathname === "") {
    teardown = homePage(root, { navigate });
  } else {
    root.replaceChildren(h("section", { class: "card" }, h("h1", {}, "Page not found"), h("p", {}, h("a", { href: "/", "data-link": "" }, "Go to the session list"))));
  }
  window.scrollTo(0, 0);
}

// Links marked data-link stay in the page; others (and modified clicks) behave as usual.
document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  event.preventDefault();
  navigate(link.getAttribute("href"));
});
window.addEventListener("popstate", route);
route();
