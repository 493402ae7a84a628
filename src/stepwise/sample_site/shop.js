// State of the Stepwise sample shop, kept in localStorage so it survives page loads.
const PRODUCTS = [
  { id: "backpack", name: "Backpack", price: 29.99 },
  { id: "bike-light", name: "Bike Light", price: 9.99 },
  { id: "bolt-t-shirt", name: "Bolt T-Shirt", price: 15.99 },
  { id: "fleece-jacket", name: "Fleece Jacket", price: 49.99 },
];

const USER_KEY = "stepwise-shop-user";
const CART_KEY = "stepwise-shop-cart";
const ORDER_KEY = "stepwise-shop-order";

function readJson(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (error) {
    return fallback;
  }
}

function cartIds() {
  return readJson(CART_KEY, []);
}

function saveCart(ids) {
  localStorage.setItem(CART_KEY, JSON.stringify(ids));
  renderBadge();
}

function productById(id) {
  return PRODUCTS.find((product) => product.id === id);
}

function formatPrice(price) {
  return "$" + price.toFixed(2);
}

// The badge beside the "Cart" link shows how many items are in the cart, or nothing when empty.
function renderBadge() {
  const badge = document.getElementById("cart-badge");
  if (badge) {
    const count = cartIds().length;
    badge.textContent = count ? String(count) : "";
  }
}

function logout() {
  localStorage.removeItem(USER_KEY);
  localStorage.removeItem(CART_KEY);
  window.location.href = "index.html";
}

document.addEventListener("DOMContentLoaded", renderBadge);
