// Keep the accounts page live: fetch its live parts from the server and swap each one in,
// every second while anything waits or runs, every few seconds otherwise.
(function () {
  "use strict";
  const table = document.getElementById("accounts");
  if (!table) return;
  const url = table.dataset.activityUrl;

  function swap(fresh) {
    for (const part of fresh.querySelectorAll("[data-live]")) {
      const old = document.querySelector(`[data-live="${CSS.escape(part.dataset.live)}"]`);
      if (old) old.replaceWith(document.importNode(part, true));
    }
    table.dataset.busy = fresh.getElementById("activity").dataset.busy;
  }

  async function poll() {
    try {
      const response = await fetch(url, {credentials: "same-origin", redirect: "manual"});
      // Logged out meanwhile (a redirect to the login page): stop asking.
      if (response.type === "opaqueredirect") return;
      if (response.ok) {
        swap(new DOMParser().parseFromString(await response.text(), "text/html"));
        table.dataset.updated = String(Date.now());
      }
    } catch (error) {
      // The site restarting: try again at the next tick.
    }
    setTimeout(poll, table.dataset.busy === "true" ? 1000 : 3000);
  }

  setTimeout(poll, table.dataset.busy === "true" ? 500 : 3000);
})();
