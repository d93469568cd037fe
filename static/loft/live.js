// Live parts of a page: an element with data-live-url has its content replaced by that URL's
// fragment every two seconds (data-live-every: other milliseconds), until a fragment carries
// data-final (the job has finished).
(function () {
  "use strict";
  document.querySelectorAll("[data-live-url]").forEach(function (box) {
    if (box.hasAttribute("data-final")) return;
    const url = box.dataset.liveUrl;
    const every = Number(box.dataset.liveEvery) || 2000;
    function refresh() {
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
        .then(function (html) {
          box.innerHTML = html;
          if (box.querySelector("[data-final]")) {
            box.setAttribute("data-final", "");
            return;
          }
          setTimeout(refresh, every);
        })
        .catch(function () { setTimeout(refresh, 5000); });
    }
    setTimeout(refresh, every);
  });
})();
